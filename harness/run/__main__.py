"""``python -m harness.run`` is ``kbit-run``."""

from harness.run.execute import main

if __name__ == "__main__":
    main()
