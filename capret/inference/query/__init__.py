"""The photo-to-shop-list query path: pipeline, gallery and query-time captioner."""
