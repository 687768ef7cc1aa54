import sys

try:
    from weightbridge.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the command line: no traceback
    print("weightbridge: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
