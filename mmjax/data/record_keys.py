"""Keys the record stream adds to records, read by the batch builders of both objectives."""

# A record that could not be read from its bytes travels down the pipeline as {BAD_RECORD: message}
# (message: which dataset, split, record, file and field), so the batch builders stop on it naming
# it, or skip and count it (data.bad_records), like any other bad record.
BAD_RECORD = "bad_record"
# The id (mixture position) of the dataset a record came from: skips are counted per dataset.
DATASET_ID = "dataset_id"
