"""The accuracy pipeline: sweep file -> runs -> train and measure -> one JSON record per run."""
