"""Hypothesis settings for the fuzz properties of tests/security (issue 7).

Two profiles, applied per test with ``@FUZZ`` so that nothing changes for
the other test directories (no global ``load_profile``):

* ``ci`` (the default): 200 examples a property, derandomized, so a CI run
  is repeatable and takes seconds;
* ``long`` (``make fuzz`` sets ``HYPOTHESIS_PROFILE=long``): FUZZ_EXAMPLES
  examples a property (default 120000).  tests/security/test_fuzz.py has
  eleven properties, so one ``make fuzz`` feeds about 1.3 million inputs
  (about an hour and a half on one core: most properties run at ~700
  inputs a second, the queue property, which drives the real scanner, at
  about 60).

Nothing here trusts or touches anything outside the test process.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mailwall-ci", max_examples=200, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
settings.register_profile(
    "mailwall-long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120000")),
    deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)

PROFILE = "mailwall-" + os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))
