import sys

from smap.main import main

sys.exit(main())
