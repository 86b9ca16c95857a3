"""The web page (`python -m wavflow.app`, scripts/launch/app.sh): generate audio from a
checkpoint for an uploaded video and/or a caption, with the same generator as `predict`.

generation.py holds what a request does (checks, sampling, outputs) without Gradio; page.py
the Gradio widgets and actions; __main__.py the command line and start-up."""
