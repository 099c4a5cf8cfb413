import sys

from build_engine.cli import main

sys.exit(main())
