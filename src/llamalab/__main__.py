import sys

from llamalab.cli import main

sys.exit(main())
