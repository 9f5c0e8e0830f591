import sys

from llamaduo_nb.cli import main

sys.exit(main())
