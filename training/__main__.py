"""The training CLI.

    python -m training bootstrap
    python -m training fit --data ../shared/data/hymenoptera/train --strategy head
    python -m training evaluate --version v2 --data ../shared/data/hymenoptera/train --json
    python -m training models --json
"""

import sys

from .cli import main

sys.exit(main())
