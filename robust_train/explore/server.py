"""The explorer's web server (Flask): the page and its scripts from the installed package, and a small JSON API
over `Explorer`. Nothing is fetched from or sent to anywhere but the address the page came from; the
Content-Security-Policy header tells the browser so too."""
from __future__ import annotations

from importlib import resources

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from robust_train.explore.images import MAX_UPLOAD_BYTES, UploadError
from robust_train.explore.session import Explorer, RequestError

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")


def create_app(explorer: Explorer) -> Flask:
    static = resources.files("robust_train.explore") / "static"
    app = Flask(__name__, static_folder=str(static), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES + 64 * 1024  # the multipart envelope around the file

    def choice():
        args = request.args
        return explorer.choice(args.get("attack", "fgsm"), args.get("steps", 20), args.get("target"),
                               args.get("map", ""))

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.errorhandler(RequestError)
    @app.errorhandler(UploadError)
    def bad_request(error):
        return jsonify(error=str(error)), 400

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return jsonify(error=f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB: upload a smaller image"), 413

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify(error=f"{error.code} {error.name}"), error.code

    @app.errorhandler(Exception)
    def server_error(error):  # the page shows it and the server keeps serving
        app.logger.exception("explore: request failed")
        return jsonify(error=f"the server could not do that ({type(error).__name__}: {error})"), 500

    @app.get("/")
    def index():
        return app.send_static_file("index.html")

    @app.get("/api/info")
    def info():
        return jsonify(explorer.describe())

    @app.get("/api/images")
    def images():
        return jsonify(explorer.thumbnails(request.args.get("show", "all"), request.args.get("class")))

    @app.post("/api/upload")
    def upload():
        file = request.files.get("image")
        if file is None:
            raise UploadError("no file in the upload: choose a PNG or JPEG image")
        return jsonify(explorer.add_upload(file.read()))

    @app.get("/api/grid")
    def grid():
        return jsonify(explorer.grid_view(request.args.get("image", "t0"), choice(), request.args.get("map", ""),
                                          request.args.get("class")))

    @app.get("/api/pathways")
    def pathways():
        args = request.args
        return jsonify(explorer.pathways(args.get("image", "t0"), choice(), args.get("eps_index", 0),
                                         args.get("k", 5), args.get("rank_by", "adversarial")))

    @app.get("/api/channel")
    def channel():
        args = request.args
        return jsonify(explorer.channel(args.get("image", "t0"), choice(), args.get("layer"), args.get("channel")))

    return app
