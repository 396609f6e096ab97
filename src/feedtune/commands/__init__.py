"""One plain function per ``feedtune`` command; ``feedtune.cli`` parses the arguments."""
