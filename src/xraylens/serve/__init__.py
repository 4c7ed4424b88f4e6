"""`xraylens serve`: a web page and a REST API that classify and explain one uploaded radiograph.

`app.create_app(run)` builds the FastAPI app (model loaded once, one worker thread owns it);
`app.serve_run(run, host=..., port=...)` checks the options and serves it with uvicorn. Uploads are read
into memory within a size limit, checked by their first bytes and decoded by the training decoders
(`xraylens.data.decode.decode_bytes`), never written to disk.
"""
