import sys

from esm2_service.server.main import main

sys.exit(main())
