import sys

from wan_lite.cli import main

sys.exit(main())
