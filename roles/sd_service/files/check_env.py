"""Load an sdserve env file the way systemd would and build the service's settings from it.

python check_env.py FILE   (run by the release's own interpreter, so its Settings class judges)
"""

import os
import sys

from sdserve.settings import Settings, unknown_environment

with open(sys.argv[1], encoding="utf-8") as env_file:
    for number, raw in enumerate(env_file, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            sys.exit(f"{sys.argv[1]}:{number}: expected KEY=VALUE")
        os.environ[key] = value
unknown = unknown_environment()
if unknown:  # a typo would otherwise be ignored by the service
    sys.exit(f"{sys.argv[1]}: {'; '.join(unknown)}")
try:
    Settings()
except Exception as e:  # pydantic names the field and the reason
    sys.exit(f"{sys.argv[1]}: {e}")
