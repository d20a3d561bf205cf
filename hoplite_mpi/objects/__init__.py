"""The object plane of a rank: what it knows about objects (catalog, lookups), getting copies
(fetch), giving copies (serve), broadcast fetches, reduce steps, and freeing."""
