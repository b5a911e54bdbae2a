import sys

try:  # Ctrl-C while Python and TensorFlow load is no bug either: nothing was written yet
    from dogtl.cli import main

    main()
except KeyboardInterrupt:
    sys.stderr.write("interrupted: finished work is kept; rerun the same command to resume\n")
    sys.exit(130)
