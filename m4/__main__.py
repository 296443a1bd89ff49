from m4.cli import main

main()
