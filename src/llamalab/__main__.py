import sys

from llamalab.cli.main import main

sys.exit(main())
