import sys

from ref_tuning.bench import main

sys.exit(main())
