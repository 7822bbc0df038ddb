"""fakeforge: the data engine of a unified fake image detection and localization corpus."""

import os

# Arrow's system allocator, unless ARROW_DEFAULT_MEMORY_POOL says otherwise (read once, when
# pyarrow first allocates: this module runs before the stages import pyarrow). The stages
# stream manifests batch by batch; the default allocator (mimalloc) keeps what the batches
# freed, and the system one gives it back (`release_unused` trims the heap). Dedup planning at
# 10^6 records: peak RSS about 670 -> 615 MiB, in the same time.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
