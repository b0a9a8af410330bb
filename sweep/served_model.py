"""The code file of the registered champion (MLflow's "models from code"): MLflow runs this file to
get the model, instead of unpickling one. Nothing else imports it."""

from mlflow.models import set_model

from sweep.serving import ImageClassifier

set_model(ImageClassifier())
