"""Analysis of finished dkd-tune searches: tidy results, Parquet, tables, plots, auto-beta validation."""
