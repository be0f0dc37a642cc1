from smoltrain.cli import main

main()
