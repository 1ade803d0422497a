"""The regional broker: enrolment, key directory, store-and-forward relay, statistics rounds."""
