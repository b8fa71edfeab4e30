import sys

from robust_train.cli import main

sys.exit(main())
