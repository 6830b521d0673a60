// Swagger UI on this server's own /openapi.json (relative: works behind a path prefix too).
// No validator badge (it would call validator.swagger.io) and no URL box: the page documents
// this service only. "Authorize" takes the API_TOKEN for the routes that need it.
window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null,
  displayOperationId: true,
  persistAuthorization: false,
});
