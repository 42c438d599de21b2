"""The training CLI.

    python -m training bootstrap
    python -m training fit --data ../shared/data/hymenoptera/train --strategy head
    python -m training evaluate --version v2 --data ../shared/data/hymenoptera/train --json
    python -m training models --json
    python -m training import --data path/to/labelled/folder
    python -m training quantize --version v2 --data ../shared/data/hymenoptera/train
    python -m training reexport --version v1
"""

import sys

from .cli import main

sys.exit(main())
