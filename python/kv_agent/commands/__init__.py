"""Subcommand groups of the ``kvagent`` CLI (registered in :data:`kv_agent.cli.COMMAND_MODULES`)."""
