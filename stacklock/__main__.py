from stacklock.cli import main

main()
