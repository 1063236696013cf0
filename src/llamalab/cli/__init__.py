"""One module per `llamalab` subcommand: HELP, add_arguments(parser), run(args) -> int."""
