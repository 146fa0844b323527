from safealign.cli import entry

entry()
