"""What a job process leaves behind and how it is read from outside: its status record, exit codes, rotated logs, failure text."""
