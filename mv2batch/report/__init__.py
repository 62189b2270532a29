"""A run's report: the tables merged from the markers, the HTML page and its evaluation views, COCO export."""
