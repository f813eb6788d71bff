from stacklock.cli.fast import main

main()
