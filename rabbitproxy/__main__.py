from rabbitproxy.cli import main

main()
