import sys

from fednano_ray.cli import main

sys.exit(main())
