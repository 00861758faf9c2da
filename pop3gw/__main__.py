"""python -m pop3gw: the same as the pop3-gw console script."""
import sys

from pop3gw.main import main

sys.exit(main())
