import sys


def run():
    """The `dogtl` command's entry point for `python -m dogtl` and `python -m dogtl.cli`."""
    try:  # Ctrl-C while Python and TensorFlow load is no bug either: nothing was written yet
        from dogtl.cli import app  # local: inside the try, so Ctrl-C while it loads is handled

        app(prog_name="dogtl")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished work is kept; rerun the same command to resume\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
