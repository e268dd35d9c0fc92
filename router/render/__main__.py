import sys

from router.render.supervisord import main

sys.exit(main())
