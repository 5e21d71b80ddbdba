"""``python -m nextscale.pipelines.rehearse``: the rehearsal, or (``--stage``) one of its stages in this process."""

import sys

from nextscale.pipelines.rehearse import main

sys.exit(main())
