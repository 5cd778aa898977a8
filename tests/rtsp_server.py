"""A real RTSP server (GStreamer's gst-rtsp-server) serving a WAV file as L16 RTP audio:

    /usr/bin/python3 tests/rtsp_server.py PORT FILE.wav      -> rtsp://127.0.0.1:PORT/scene

Run with a Python that has the GObject bindings (Debian: python3-gi gir1.2-gst-rtsp-server-1.0
gstreamer1.0-plugins-base gstreamer1.0-plugins-good); each client gets the file from its start,
paced at real time. Prints "ready" once it listens."""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port, path = sys.argv[1], sys.argv[2]
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f'( filesrc location="{path}" ! wavparse ! audioconvert ! audio/x-raw,format=S16BE '
                   "! rtpL16pay name=pay0 pt=96 )")
factory.set_shared(False)
server.get_mount_points().add_factory("/scene", factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on 127.0.0.1:{port}")
print("ready", flush=True)
GLib.MainLoop().run()
