import sys

from pkg.deviceplugin.cli import main

sys.exit(main())
