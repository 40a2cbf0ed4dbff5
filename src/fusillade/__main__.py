from __future__ import annotations

from fusillade.cli.main import main

main()
