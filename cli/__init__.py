"""The ``twostream`` command line: argument parsing and printing only; each command calls one stage."""
