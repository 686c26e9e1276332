import sys

from esm2_service.worker.main import main

sys.exit(main())
