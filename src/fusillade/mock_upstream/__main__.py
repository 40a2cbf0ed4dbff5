from __future__ import annotations

from fusillade.mock_upstream.command import main

main()
