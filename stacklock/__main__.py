from stacklock.cli.app import main

main()
