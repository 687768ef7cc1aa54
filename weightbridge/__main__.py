import sys

from weightbridge.cli import main

sys.exit(main())
