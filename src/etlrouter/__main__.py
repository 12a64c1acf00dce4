from etlrouter.cli import main

main()
