from dogtl.cli import main

main()
