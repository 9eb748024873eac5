from diffto.cli import main

main()
