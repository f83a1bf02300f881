import sys

from lightx2v.cli import main

sys.exit(main())
